"""``python -m pytest_nsbox doctor``: the same as the ``nsbox`` command."""

from .cli import main

raise SystemExit(main())
