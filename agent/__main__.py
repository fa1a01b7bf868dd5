"""`python -m agent`: the same as `lineside-agent`."""

from agent.cli import main

raise SystemExit(main())
