"""``nodeagent doctor``: the node's health, one line per check, as ``cilium status`` gives it.

``verdicts`` judges facts (pure); ``node`` gathers them from the node itself.
"""
