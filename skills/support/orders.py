"""``extract_order``: the order number a customer mentions, for later steps to look up."""

from __future__ import annotations

import re
from typing import Any

from skills.registry import SkillContext, skill

from .ticket import content_of, ticket_of

# "order 1042", "order #1042", "order no. 1042", "order number 1042", "#1042"
ORDER_NUMBER = re.compile(r"(?:\border\s*(?:no\.?|number|#)?\s*#?|#)(\d{3,10})\b", re.IGNORECASE)


@skill(
    description="Adds order_id: the first order number in the customer's message "
    "('order 1042', '#1042'), or null when there is none.",
    soft_time_limit=2,
    time_limit=5,
)
def extract_order(ctx: SkillContext, input: Any) -> Any:
    ticket = ticket_of(input)
    match = ORDER_NUMBER.search(content_of(ticket))
    return {**ticket, "order_id": int(match.group(1)) if match else None}
