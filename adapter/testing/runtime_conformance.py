"""The runtime plugin conformance kit.

A runtime plugin's own test module subclasses :class:`RuntimeConformance` and provides
three pytest fixtures bound to a real server of that runtime (started by the test
session):

``plugin``
    a started :class:`~adapter.plugin.RuntimePlugin` talking to the runtime, whose
    ``settings.root_model_dir`` is the runtime's shared volume;
``model_factory``
    a :class:`ModelFactory`: ``good(model_id)`` places a servable model where the
    puller would (``ROOT_MODEL_DIR/<model_id>/...``) and returns its
    :class:`~puller.request.LocalModel`; ``broken(model_id)`` the same for a model the
    runtime must refuse; ``infer(model_id)`` sends one inference to the runtime under
    the model id and raises when it does not answer correctly;
``flow_settings``
    (optional) overrides for the :class:`~adapter.flow.ModelFlow` tests.

Every test then drives the plugin the way the sidecar does, directly and through the
real :class:`~adapter.flow.ModelFlow`, and checks the contract of
:mod:`adapter.plugin`: readiness, layout, load, servability under the model id,
listing, unload (``ModelNotFound`` for an unknown model), refusals carrying the
runtime's status code, sizes, and the purge before the first READY::

    class TestMyRuntime(RuntimeConformance):
        @pytest.fixture
        async def plugin(self, my_server): ...

        @pytest.fixture
        def model_factory(self, my_server): ...

The kit needs pytest and pytest-asyncio (test dependencies only).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import pytest

from adapter.errors import ModelNotFound, RuntimeRejected, SidecarError
from adapter.flow import LoadRequest, ModelFlow
from adapter.plugin import RuntimePlugin
from puller.request import LocalModel


class ModelFactory(Protocol):
    """Models of the runtime under test, placed under ROOT_MODEL_DIR."""

    def good(self, model_id: str) -> LocalModel:
        """A servable model, pulled as the puller would leave it."""

    def broken(self, model_id: str) -> LocalModel:
        """A model the runtime must refuse to load."""

    async def infer(self, model_id: str) -> None:
        """One inference under ``model_id``; raises when it fails or answers wrongly."""


def _fresh_id(tag: str) -> str:
    return f"conf-{tag}__{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def _cleanup(plugin: RuntimePlugin, *model_ids: str) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for model_id in model_ids:
            with contextlib.suppress(ModelNotFound, SidecarError):
                await plugin.unload(model_id)
            await asyncio.to_thread(plugin.remove_view, model_id)


class RuntimeConformance:
    """Contract tests every runtime plugin must pass. See the module docstring."""

    @pytest.fixture
    def flow_settings(self) -> Mapping[str, Any]:
        return {}

    def _flow(self, plugin: RuntimePlugin, overrides: Mapping[str, Any]) -> ModelFlow:
        settings = dataclasses.replace(plugin.settings, **dict(overrides))
        return ModelFlow(settings, plugin, None)

    # --- status -------------------------------------------------------------------------

    async def test_ready_version_and_method_infos(self, plugin: RuntimePlugin) -> None:
        assert await plugin.is_ready() is True
        version = await plugin.runtime_version()
        assert version is None or (isinstance(version, str) and version)
        infos = plugin.method_infos()
        assert infos, "a runtime must name the inference methods the mesh may route"
        for method, path in infos.items():
            service, _, name = method.partition("/")
            assert "." in service and name, f"method {method!r} is not package.Service/Method"
            assert all(isinstance(n, int) and n > 0 for n in path)

    # --- load / unload ------------------------------------------------------------------

    async def test_layout_load_infer_list_unload(
        self, plugin: RuntimePlugin, model_factory: ModelFactory
    ) -> None:
        model_id = _fresh_id("cycle")
        model = model_factory.good(model_id)
        async with _cleanup(plugin, model_id):
            view = await asyncio.to_thread(plugin.layout, model)
            assert view.is_relative_to(plugin.models_dir)
            size = await plugin.load(model_id, view, model)
            assert size is None or size >= 0
            await model_factory.infer(model_id)
            assert model_id in await plugin.list_models()
            await plugin.unload(model_id)
            assert model_id not in await plugin.list_models()
            await asyncio.to_thread(plugin.remove_view, model_id)
            assert not plugin.view_dir(model_id).exists()
            # the pulled files are the puller's: the plugin never touches them
            assert model.path.exists()

    async def test_unload_of_an_unknown_model_is_model_not_found(self, plugin: RuntimePlugin) -> None:
        with pytest.raises(ModelNotFound):
            await plugin.unload(_fresh_id("unknown"))

    async def test_layout_replaces_an_old_view_and_reload_works(
        self, plugin: RuntimePlugin, model_factory: ModelFactory
    ) -> None:
        model_id = _fresh_id("reload")
        model = model_factory.good(model_id)
        async with _cleanup(plugin, model_id):
            view = await asyncio.to_thread(plugin.layout, model)
            await plugin.load(model_id, view, model)
            await plugin.unload(model_id)
            view = await asyncio.to_thread(plugin.layout, model)  # over the old view
            await plugin.load(model_id, view, model)
            await model_factory.infer(model_id)

    async def test_two_models_at_once(self, plugin: RuntimePlugin, model_factory: ModelFactory) -> None:
        first, second = _fresh_id("two-a"), _fresh_id("two-b")
        models = [model_factory.good(first), model_factory.good(second)]
        async with _cleanup(plugin, first, second):
            views = [await asyncio.to_thread(plugin.layout, m) for m in models]
            await asyncio.gather(*(plugin.load(m.model_id, v, m) for m, v in zip(models, views, strict=True)))
            await model_factory.infer(first)
            await model_factory.infer(second)
            assert {first, second} <= set(await plugin.list_models())

    async def test_a_broken_model_is_refused_with_the_runtimes_code(
        self, plugin: RuntimePlugin, model_factory: ModelFactory
    ) -> None:
        model_id = _fresh_id("broken")
        model = model_factory.broken(model_id)
        async with _cleanup(plugin, model_id):
            with pytest.raises(SidecarError) as info:
                view = await asyncio.to_thread(plugin.layout, model)
                await plugin.load(model_id, view, model)
            error = info.value
            if isinstance(error, RuntimeRejected):
                assert error.code and error.code != "OK"
            assert str(error)

    async def test_model_size_is_none_or_positive(
        self, plugin: RuntimePlugin, model_factory: ModelFactory
    ) -> None:
        model_id = _fresh_id("size")
        model = model_factory.good(model_id)
        async with _cleanup(plugin, model_id):
            view = await asyncio.to_thread(plugin.layout, model)
            await plugin.load(model_id, view, model)
            size = await plugin.model_size(model_id)
            assert size is None or size > 0

    # --- through the flow ---------------------------------------------------------------

    async def test_flow_purges_then_loads_and_unloads(
        self, plugin: RuntimePlugin, model_factory: ModelFactory, flow_settings: Mapping[str, Any]
    ) -> None:
        leftover = _fresh_id("leftover")
        model = model_factory.good(leftover)
        async with _cleanup(plugin, leftover):
            view = await asyncio.to_thread(plugin.layout, model)
            await plugin.load(leftover, view, model)  # "from before a restart"
            flow = self._flow(plugin, flow_settings)
            info = await flow.runtime_status()
            assert info.ready
            assert leftover not in await plugin.list_models()
            assert not plugin.view_dir(leftover).exists()

            model_id = _fresh_id("flow")
            fresh = model_factory.good(model_id)
            request = LoadRequest.parse(
                model_id, str(fresh.path), f"mt:{fresh.model_type}", fresh.rewritten_key()
            )
            async with _cleanup(plugin, model_id):
                result = await flow.load(request)
                # 0 is allowed: it makes the mesh ask modelSize (TorchServe does so)
                assert result.size_bytes >= 0
                await model_factory.infer(model_id)
                assert await flow.model_size(model_id) > 0
                await flow.unload(model_id)
                assert model_id not in await plugin.list_models()
                await flow.unload(model_id)  # again: unknown is fine
