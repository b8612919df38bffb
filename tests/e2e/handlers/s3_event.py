"""Returns the s3 envelope it got, and whether its subject names an object in the store."""

from __future__ import annotations

from typing import Any

import botocore.session
from botocore.exceptions import ClientError


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Look the decoded key up with the AWS_* connection eventrun passes in; answer with the event."""
    data = event["data"]
    context.logger.info("got %s for s3://%s/%s", event["type"], data["bucket"], event["subject"])
    s3 = botocore.session.get_session().create_client("s3")
    try:
        size = s3.head_object(Bucket=data["bucket"], Key=event["subject"])["ContentLength"]
    except ClientError:
        size = None
    return {"event": event, "stored_size": size}
