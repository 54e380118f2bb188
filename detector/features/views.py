"""Truncated views of a billing history: what was known about a client some time before.

Inspection dates are not in the STEG data, but an inspection leaves traces in the later history
(a meter replaced when the fraud was found, a corrected bill, consumption that rises once a
bypass is removed). A model that learns those traces looks good on full histories and cannot
find a thief who has not been caught yet. Training therefore judges every model on histories
cut 12 and 24 months before their last invoice as well (`ptd train` reports all three views),
and trains on several cuts of each client (augmentation), so that it learns what a history
looks like *before* an inspection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

# The views every model is evaluated on: the full history, and cut 12 and 24 months back.
EVALUATION_CUTS = (0, 12, 24)


def view_name(months: int) -> str:
    """ "full" for the whole history, else "cut_12m" for a cut 12 months back."""
    return "full" if months == 0 else f"cut_{months}m"


def months_before(days: np.ndarray, months: int) -> np.ndarray:
    """Calendar arithmetic on days since 1970-01-01: 2015-03-31 minus 1 month is 2015-02-28."""
    import pandas as pd

    dates = pd.Series(pd.to_datetime(days, unit="D"))
    shifted = dates - pd.DateOffset(months=months)
    result: np.ndarray = (
        shifted.to_numpy().astype("datetime64[D]").astype(np.int64).astype(np.float64)
    )
    return result


def cut_before_last(invoices: pd.DataFrame, months: int) -> pd.DataFrame:
    """Each client's invoices dated at least `months` calendar months before its own last one.

    `invoices` is a prepared invoice frame (`invoice_day` in days since 1970-01-01): with the
    last invoice on 2015-01-01, a 12-month cut keeps the invoices up to 2014-01-01 included.
    Clients left without any invoice drop out; `months=0` returns the frame itself.
    """
    import pandas as pd

    if months == 0 or not len(invoices):
        return invoices
    last = invoices.groupby("client_id", sort=False)["invoice_day"].max()
    cutoff = pd.Series(months_before(last.to_numpy(dtype=np.float64), months), last.index)
    limit = invoices["client_id"].map(cutoff).to_numpy(dtype=np.float64)
    keep = invoices["invoice_day"].to_numpy(dtype=np.float64) <= limit
    return invoices[keep].reset_index(drop=True)
