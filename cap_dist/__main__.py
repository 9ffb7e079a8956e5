"""`python -m cap_dist` is the `cap-dist` command (and the `ray job submit` entrypoint)."""

from cap_dist.cli import main

raise SystemExit(main())
