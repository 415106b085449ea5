"""``python -m data_pipeline.demo_data``: the documented command (``data_pipeline.shards.demo_data``)."""

import sys

from data_pipeline.shards.demo_data import main

if __name__ == "__main__":
    sys.exit(main())
