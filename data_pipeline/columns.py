"""``python -m data_pipeline.columns``: the documented command (``data_pipeline.dataset.columns``)."""

import sys

from data_pipeline.dataset.columns import main

if __name__ == "__main__":
    sys.exit(main())
