"""``python -m nodeagent``: the same CLI as the ``nodeagent`` command."""

from nodeagent.cli import main

raise SystemExit(main())
