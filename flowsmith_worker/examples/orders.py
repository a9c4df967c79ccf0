"""The order flow of the demo: four calls to fake APIs that fail at random.

    get_product -> get_payment_methods -> create_payment -> send_notification

Run it yourself: ``flowsmith worker flowsmith_worker.examples.orders``.
Set FLOWSMITH_DEMO_FAILURE_RATE (default 0.15) to make the APIs flakier.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from flowsmith_worker import Context, Flow, fixed

FAILURE_RATE = float(os.environ.get("FLOWSMITH_DEMO_FAILURE_RATE", "0.15"))
LATENCY_SECONDS = (0.01, 0.06)


class FakeAPIError(ConnectionError):
    """A remote API timed out or answered 503."""


def _call_api(name: str) -> None:
    time.sleep(random.uniform(*LATENCY_SECONDS))
    if random.random() < FAILURE_RATE:
        raise FakeAPIError(f"{name}: 503 Service Unavailable")


def get_product(ctx: Context) -> dict[str, Any]:
    _call_api("catalog API")
    return {"product_id": ctx.data["product_id"], "price_cents": 1999}


def get_payment_methods(ctx: Context) -> list[str]:
    _call_api("wallet API")
    return ["card_visa_4242"]


def create_payment(ctx: Context) -> dict[str, Any]:
    # The idempotency key makes an at-least-once retry safe at the payment provider.
    _call_api("payments API")
    return {
        "payment_id": f"pay_{ctx.tracking_id}",
        "idempotency_key": f"{ctx.tracking_id}:create_payment",
        "amount_cents": ctx.data["get_product"]["price_cents"],
        "method": ctx.data["get_payment_methods"][0],
    }


def send_notification(ctx: Context) -> str:
    _call_api("email API")
    return f"receipt sent to {ctx.data['user_id']}"


order_flow = Flow("demo_order")
order_flow.step("get_product", get_product, retries=4, backoff=fixed(0.2))
order_flow.step("get_payment_methods", get_payment_methods, retries=4, backoff=fixed(0.2))
order_flow.step("create_payment", create_payment, retries=4, backoff=fixed(0.2), timeout=10)
order_flow.step("send_notification", send_notification, retries=4, backoff=fixed(0.2))
