"""ETL example: when a CSV lands in a bucket, write per-column counts and sums next to it as JSON.

Wire it to uploads in eventrun.toml:

    [functions.csv_summary]
    handler = "functions/csv_summary.py:main_handler"
    timeout = "15m"

    [[functions.csv_summary.triggers]]
    type = "s3"
    bucket = "uploads"
    events = ["s3:ObjectCreated:*"]
    prefix = "in/"
    suffix = ".csv"        # the summary ends in .json, so writing it cannot trigger this again

`in/sales 2024.csv` becomes `summaries/in/sales 2024.json`:
{"source": "s3://uploads/in/sales 2024.csv", "rows": 3,
 "columns": {"amount": {"count": 3, "numeric": 3, "sum": 60.5, "min": 10, "max": 30.5}, ...}}
"""

from __future__ import annotations

import codecs
import csv
import json
import math
import os
from typing import Any

import botocore.session

PROGRESS_EVERY = 10_000  # rows between two progress lines in the run's log


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Summarise the CSV object the event names; return where the summary went."""
    data = event["data"]
    bucket, key = data["bucket"], data["key"]  # the key is already decoded: use it as it is
    log = context.logger
    if not key.lower().endswith(".csv"):
        log.info("s3://%s/%s is not a CSV file; nothing to do", bucket, key)
        return {"skipped": key}

    # eventrun hands the [s3] table to every instance as AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    # AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION, so a plain client reaches the same store.
    # (boto3.client("s3") works the same way if you have boto3.)
    s3 = botocore.session.get_session().create_client("s3")

    log.info("reading s3://%s/%s (%s bytes)", bucket, key, data.get("size"))
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    # Streamed line by line, so a file larger than memory is fine; utf-8-sig drops a BOM.
    lines = codecs.iterdecode(body.iter_lines(keepends=True), "utf-8-sig")
    rows, columns = summarise(csv.DictReader(lines), log)

    target = summary_key(key, os.environ.get("SUMMARY_PREFIX", "summaries/"))
    summary = {"source": f"s3://{bucket}/{key}", "etag": data.get("etag"), "rows": rows, "columns": columns}
    s3.put_object(
        Bucket=bucket,
        Key=target,
        Body=json.dumps(summary, ensure_ascii=False, indent=2).encode(),
        ContentType="application/json",
    )
    log.info("wrote s3://%s/%s: %d rows, %d columns", bucket, target, rows, len(columns))
    return {"summary": f"s3://{bucket}/{target}", "rows": rows, "columns": len(columns)}


def summarise(reader: csv.DictReader[str], log: Any) -> tuple[int, dict[str, dict[str, Any]]]:
    """Rows read, and per column: non-empty values, numeric values, and their sum, min and max."""
    columns: dict[str, dict[str, Any]] = {
        name: {"count": 0, "numeric": 0, "sum": 0, "min": None, "max": None}
        for name in reader.fieldnames or []
    }
    rows = 0
    for row in reader:
        rows += 1
        for name, value in row.items():
            if name not in columns or not isinstance(value, str) or not value.strip():
                continue  # cells beyond the header, or empty ones
            column = columns[name]
            column["count"] += 1
            number = to_number(value)
            if number is not None:
                column["numeric"] += 1
                column["sum"] += number
                column["min"] = number if column["min"] is None else min(column["min"], number)
                column["max"] = number if column["max"] is None else max(column["max"], number)
        if rows % PROGRESS_EVERY == 0:
            log.info("%d rows so far", rows)
    return rows, columns


def to_number(text: str) -> int | float | None:
    """An int or a finite float, or None for anything else."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def summary_key(key: str, prefix: str) -> str:
    """in/sales 2024.csv -> summaries/in/sales 2024.json."""
    return prefix + key[: -len(".csv")] + ".json"
