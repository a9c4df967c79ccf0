"""The FastAPI example of the README, run against the real PostgreSQL server.

An async endpoint writes an order and enqueues its flow in ONE transaction of the
application's own (SQLAlchemy's asyncio engine on asyncpg), with
``await checkout.run_async(..., connection=conn)``: both commit, or neither does.
Other endpoints find the run again by its tracking_id and wait for its result
with ``await run.wait_async()``, never blocking the event loop. A real worker
(in a thread here; `flowsmith worker app` in production) runs the flow.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from flowsmith_worker import (
    Context,
    FlowCancelled,
    FlowNotFound,
    FlowRun,
    StepFailed,
    Worker,
    create_storage,
)
from flowsmith_worker.decorators import Workflow, step, workflow
from flowsmith_worker.storage.base import Storage
from tests.conftest import database_url

# -- the example (the README shows it as one module: app.py) -------------------------

metadata = sa.MetaData()
orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("item", sa.String(100), nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
)


def define_checkout(name: str, storage: Storage) -> Workflow:
    """The README defines this at module level, as ``@workflow("checkout")``."""

    @workflow(name, storage=storage)
    def checkout() -> None:
        @step(retries=3)
        async def charge(ctx: Context) -> dict[str, int]:
            await asyncio.sleep(0.01)  # e.g. await payments.post(...) with an httpx.AsyncClient
            return {"amount": ctx.data["quantity"] * 5}

        @step
        def ship(ctx: Context) -> str:
            return f"shipped order {ctx.data['order_id']}"

    return checkout


class OrderIn(BaseModel):
    item: str
    quantity: int


def make_app(checkout: Workflow, async_database_url: str) -> FastAPI:
    """The README's app.py: ``engine = create_async_engine(os.environ["DATABASE_URL"])``."""
    engine = create_async_engine(async_database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/orders", status_code=201)
    async def create_order(order: OrderIn) -> dict[str, Any]:
        async with engine.begin() as conn:  # the order and its flow run: one transaction
            inserted = await conn.execute(
                orders.insert().values(item=order.item, quantity=order.quantity)
            )
            order_id = inserted.inserted_primary_key[0]
            run = await checkout.run_async(
                {"order_id": order_id, "quantity": order.quantity},
                tracking_id=f"order-{order_id}",
                connection=conn,
            )
            if order.quantity > 100:  # refused after the enqueue: both roll back
                raise HTTPException(422, "at most 100 of an item per order")
        return {"order_id": order_id, "tracking_id": run.tracking_id}

    async def find(tracking_id: str) -> FlowRun:
        try:  # a database read: in a thread, so the loop goes on
            return await asyncio.to_thread(checkout.get_run, tracking_id)
        except FlowNotFound:
            raise HTTPException(404, f"no order has tracking id {tracking_id!r}") from None

    @app.get("/orders/{tracking_id}")
    async def order_status(tracking_id: str) -> dict[str, str]:
        run = await find(tracking_id)
        return {"status": await asyncio.to_thread(run.status)}

    @app.get("/orders/{tracking_id}/result")
    async def order_result(tracking_id: str) -> dict[str, Any]:
        run = await find(tracking_id)
        try:
            return await run.wait_async(timeout=10)
        except (StepFailed, FlowCancelled) as exc:
            raise HTTPException(409, str(exc)) from None
        except TimeoutError:
            raise HTTPException(504, "the order is still being processed") from None

    return app


# -- the tests -----------------------------------------------------------------------


class Shop:
    """The example app on a fresh PostgreSQL database, its tables, a worker, a client."""

    def __init__(self, url: str, flow_name: str) -> None:
        self.engine = sa.create_engine(url)
        metadata.create_all(self.engine)
        self.storage = create_storage(url)
        self.storage.migrate()
        self.checkout = define_checkout(flow_name, self.storage)
        async_url = sa.make_url(url).set(drivername="postgresql+asyncpg", query={})
        self.async_url = async_url.render_as_string(hide_password=False)
        self.app = make_app(self.checkout, self.async_url)
        self.worker = Worker(storage=self.storage, poll_interval=0.1)
        self.worker_thread = threading.Thread(target=self.worker.run, name="example-worker")

    def count(self, table: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())

    def close(self) -> None:
        if self.worker_thread.is_alive():
            self.worker.stop()
            self.worker_thread.join(timeout=30)
        self.storage.close()
        self.engine.dispose()


@pytest.fixture
def shop(
    request: pytest.FixtureRequest,
    postgres_server: Any,
    tmp_path: Path,
    unique: Any,
) -> Iterator[Shop]:
    made = Shop(database_url(request, "postgresql", tmp_path), unique("checkout"))
    yield made
    made.close()


def test_an_order_and_its_flow_commit_together_and_its_result_is_served(shop: Shop) -> None:
    """POST /orders writes the order and enqueues its run in one transaction (both are
    there once it answers); the worker runs the async and the sync step; GET the status
    by tracking_id, then the result, awaited by wait_async in the endpoint."""
    with TestClient(shop.app) as client:
        created = client.post("/orders", json={"item": "lamp", "quantity": 3})
        assert created.status_code == 201, created.text
        tracking_id = created.json()["tracking_id"]
        order_id = created.json()["order_id"]
        assert tracking_id == f"order-{order_id}"
        assert shop.count("orders") == 1
        assert client.get(f"/orders/{tracking_id}").json() == {"status": "PENDING"}

        shop.worker_thread.start()
        result = client.get(f"/orders/{tracking_id}/result")
        assert result.status_code == 200, result.text
        assert result.json() == {
            "order_id": order_id,
            "quantity": 3,
            "charge": {"amount": 15},
            "ship": f"shipped order {order_id}",
        }
        assert client.get(f"/orders/{tracking_id}").json() == {"status": "COMPLETED"}


def test_a_request_that_fails_after_enqueueing_leaves_neither_order_nor_run(shop: Shop) -> None:
    """An endpoint that raises after run_async, inside its transaction, rolls back the
    order and the flow run alike: no worker could ever run a flow for an order that
    does not exist."""
    with TestClient(shop.app) as client:
        refused = client.post("/orders", json={"item": "lamp", "quantity": 101})
        assert refused.status_code == 422, refused.text
        assert shop.count("orders") == 0
        assert shop.count("fs_flows") == 0
        assert shop.count("fs_nodes") == 0

        accepted = client.post("/orders", json={"item": "lamp", "quantity": 1})
        assert accepted.status_code == 201, accepted.text
        assert shop.count("orders") == shop.count("fs_flows") == 1


def test_an_unknown_tracking_id_is_a_404(shop: Shop) -> None:
    """get_run's FlowNotFound becomes the app's 404, for the status and the result."""
    with TestClient(shop.app) as client:
        assert client.get("/orders/order-404").status_code == 404
        assert client.get("/orders/order-404/result").status_code == 404


def test_run_async_takes_an_async_session_and_its_transaction(shop: Shop) -> None:
    """connection= may also be an ORM AsyncSession: the run joins the session's
    transaction, committed with it or rolled back with it."""

    async def enqueue_twice() -> None:
        engine = create_async_engine(shop.async_url)
        try:
            async with AsyncSession(engine) as session, session.begin():
                await shop.checkout.run_async({"quantity": 1}, "kept", connection=session)
            async with AsyncSession(engine) as session:
                await session.begin()
                await shop.checkout.run_async({"quantity": 1}, "dropped", connection=session)
                await session.rollback()
        finally:
            await engine.dispose()

    asyncio.run(enqueue_twice())
    assert shop.checkout.get_run("kept").status() == "PENDING"
    with pytest.raises(FlowNotFound):
        shop.checkout.get_run("dropped")
