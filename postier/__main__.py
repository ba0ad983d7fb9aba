"""`python -m postier` is the same as the `postier` console script."""

from postier.cli import main

raise SystemExit(main())
