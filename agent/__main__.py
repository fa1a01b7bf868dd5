"""`python -m agent`: the same as `lineside-agent`."""

from lineside.agent.cli import main

raise SystemExit(main())
