"""``python -m data_pipeline.make_shards``: the documented command (``data_pipeline.shards.make_shards``)."""

import sys

from data_pipeline.shards.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
