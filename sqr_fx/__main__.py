"""``python -m sqr_fx``: see :mod:`sqr_fx.cli`."""
from .cli import main

raise SystemExit(main())
