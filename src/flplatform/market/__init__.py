"""The model market: what organisations publish for others to call and copy.

* ``service``: the listing (``GET /api/market/models/``) and one published model's card, with
  what a buyer needs to call it;
* ``copies``: ``POST /api/models/{id}/copy/`` (a new global model in the caller's organisation
  from a round of the source's history, the same blobs, charged ``model_copy``) and
  ``POST /api/models/{id}/pull/`` (a copy moves to a newer round, ``model_copy_update``).

Prices, publication and the money moved live in :mod:`flplatform.billing` (``market.py``).
"""
