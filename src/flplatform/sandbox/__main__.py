"""``python -I -m flplatform.sandbox``: a sandbox worker (see :mod:`flplatform.sandbox.worker`)."""

from flplatform.sandbox.worker import main

main()
