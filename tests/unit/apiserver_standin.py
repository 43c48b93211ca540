"""The stand-in API server of the unit tests: nodeagent.testbed.apiserver (the testbed runs it
too), under the name the tests import."""

from nodeagent.testbed.apiserver import APIServerStandIn, plural, resource_of

__all__ = ["APIServerStandIn", "plural", "resource_of"]
