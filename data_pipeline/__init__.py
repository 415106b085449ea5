"""Data: shards on disk or in object storage, in sub-packages by concern.

* ``dataset``: what a shard folder is (sample table, columns, index files, labels, locations, hashing);
* ``order``: which rank reads which row, in which order, with which crop (pure functions);
* ``remote``: object stores, the node-local shard cache, read-ahead, checks before launch;
* ``loaders``: the training loader interface, DALI and PyTorch loaders, evaluation, start-up checks;
* ``shards``: the offline tools (make_shards, index_shards, upload, verify, stats, demo data).

Imports point one way: ``shards`` and ``loaders`` use ``dataset``, ``order`` and ``remote``; ``remote``
uses ``dataset``; ``dataset`` and ``order`` use nothing above them. The modules at this level
(``make_shards``, ``index_shards``, ...) keep the documented ``python -m data_pipeline.<tool>``
commands working.
"""
