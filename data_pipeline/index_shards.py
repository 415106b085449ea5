"""``python -m data_pipeline.index_shards``: the documented command (``data_pipeline.shards.index_shards``)."""

import sys

from data_pipeline.shards.index_shards import main

if __name__ == "__main__":
    sys.exit(main())
