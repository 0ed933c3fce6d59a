"""``python -m outer_train.cli`` = ``learned-opt``."""

from outer_train.cli import main

raise SystemExit(main())
