"""``python -m data_pipeline.stats``: the documented command (``data_pipeline.shards.stats``)."""

import sys

from data_pipeline.shards.stats import main

if __name__ == "__main__":
    sys.exit(main())
