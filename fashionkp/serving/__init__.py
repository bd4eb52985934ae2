"""``fashionkp serve``: trained models behind an HTTP API and a web page (``server.py``, on LitServe: the ``serve``
extra). The limits live here, where the command line reads its defaults without importing LitServe."""

#: Photos above this many pixels are refused (413) unless the server is told otherwise: 25 MP takes every camera
#: photo up to 6000 x 4000, and a decoded photo of that size is already 75 MB in memory.
MAX_PIXELS = 25_000_000
#: Request bodies above this many bytes are refused (413) by LitServe before they are read whole.
MAX_BYTES = 64 * 2**20
