"""``python -m streamlstm ...``: same as the ``streamlstm`` command."""
import sys

from .cli import main

sys.exit(main())
