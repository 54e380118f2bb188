"""`python -m detector` is the `ptd` command."""

from detector.cli import main

raise SystemExit(main())
