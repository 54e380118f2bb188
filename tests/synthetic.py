"""A small synthetic data set in the STEG schema, with a learnable fraud signal.

Fraudulent clients bill less in their latest invoices, more often report a meter status other
than 0 and have their meter replaced. Tests train tiny models on it in tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def make_steg(
    n_clients: int = 400, seed: int = 0, fraud_rate: float = 0.2
) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    ids = [f"c{i:05d}" for i in range(n_clients)]
    target = (rng.random(n_clients) < fraud_rate).astype(float)
    creation = pd.to_datetime("1990-01-01") + pd.to_timedelta(
        rng.integers(0, 9000, n_clients), unit="D"
    )
    clients = pd.DataFrame(
        {
            "disrict": rng.choice([60, 62, 63, 69], n_clients),
            "client_id": ids,
            "client_catg": rng.choice([11, 12, 51], n_clients, p=[0.9, 0.05, 0.05]),
            "region": rng.choice([101, 103, 107, 301], n_clients),
            "creation_date": creation.strftime("%d/%m/%Y"),
            "target": target,
        }
    )
    rows = []
    for i, client in enumerate(ids):
        fraud = target[i] == 1
        n = int(rng.integers(1, 30))
        start = pd.Timestamp("2010-01-01") + pd.Timedelta(days=int(rng.integers(0, 1500)))
        level = rng.uniform(100, 600)
        meter = int(rng.integers(1000, 9_999_999))
        index = int(rng.integers(0, 20000))
        for k in range(n):
            drop = fraud and k >= n * 0.6
            consumption = max(0, int(rng.normal(level * (0.3 if drop else 1.0), 40)))
            if fraud and k == n // 2 and rng.random() < 0.6:
                meter += 1
            status = "1" if (fraud and rng.random() < 0.3) or rng.random() < 0.02 else "0"
            kind = "ELEC" if rng.random() < 0.75 else "GAZ"
            rows.append(
                {
                    "client_id": client,
                    "invoice_date": (start + pd.Timedelta(days=120 * k)).strftime("%Y-%m-%d"),
                    "tarif_type": 11 if kind == "ELEC" else 40,
                    "counter_number": meter,
                    "counter_statue": status,
                    "counter_code": 203 if kind == "ELEC" else 5,
                    "reading_remarque": int(rng.choice([6, 8, 9])),
                    "counter_coefficient": 1,
                    "consommation_level_1": min(consumption, 400),
                    "consommation_level_2": max(0, consumption - 400),
                    "consommation_level_3": 0,
                    "consommation_level_4": 0,
                    "old_index": index,
                    "new_index": index + consumption,
                    "months_number": 4,
                    "counter_type": kind,
                }
            )
            index += consumption
    return clients, pd.DataFrame(rows)


def write_steg(directory: Path, n_clients: int = 400, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    clients, invoices = make_steg(n_clients, seed)
    clients.to_parquet(directory / "clients_train.parquet", index=False)
    invoices.to_parquet(directory / "invoices_train.parquet", index=False)
    return directory
