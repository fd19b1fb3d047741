"""`python -m kvpass`: the `kvpass` command line (`kvpass.cli`)."""

from kvpass.cli import main

raise SystemExit(main())
