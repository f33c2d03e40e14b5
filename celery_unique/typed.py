"""What type checkers see: the unique options as typed keywords of tasks and signatures.

Celery ships no annotations. celery-types types it, but its ``Signature.set``
takes only Celery's own options (so ``.set(unique=60)`` is an error) and its
``AsyncResult`` is generic. These declarations give type checkers, with or
without celery-types, a typed ``unique``, ``unique_on``, ``unique_until`` and
``on_duplicate``:

- ``typed_apply_async`` declares ``UniqueTask.apply_async``'s signature over
  its implementation, which takes the options in ``**options``;
- ``UniqueSignature`` is the signature of a unique task (``.s()``, ``.si()``,
  ``.signature()``): a ``Signature`` whose ``set``, ``apply_async`` and
  ``delay`` take the options.

None of it does anything at run time: ``UniqueSignature`` is Celery's
``Signature``, and ``typed_apply_async`` returns the function it decorates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from celery.canvas import Signature

__all__ = ["UniqueSignature", "typed_apply_async"]

if TYPE_CHECKING:
    from typing import ParamSpec, TypeVar

    from celery.result import AsyncResult

    from .options import OnDuplicate, OnStoreError, UniqueOn, Until, WhileRunning

    _P = ParamSpec("_P")
    _R = TypeVar("_R")

    class UniqueSignature(Signature[Any]):  # type: ignore[misc,unused-ignore]  # Any without celery-types
        """A unique task's signature: ``set`` and ``apply_async`` take the unique options."""

        def set(
            self,
            immutable: bool | None = ...,
            *,
            unique: float | timedelta | None = ...,
            unique_on: UniqueOn | None = ...,
            unique_until: Until | None = ...,
            on_duplicate: OnDuplicate | None = ...,
            unique_on_store_error: OnStoreError | None = ...,
            unique_max_wait: float | timedelta | None = ...,
            unique_limit: int | None = ...,
            unique_while_running: WhileRunning | None = ...,
            **options: Any,
        ) -> UniqueSignature: ...

        def apply_async(
            self,
            args: Sequence[Any] | None = ...,
            kwargs: Mapping[str, Any] | None = ...,
            route_name: str | None = ...,
            *,
            unique: float | timedelta | None = ...,
            unique_on: UniqueOn | None = ...,
            unique_until: Until | None = ...,
            on_duplicate: OnDuplicate | None = ...,
            unique_on_store_error: OnStoreError | None = ...,
            unique_max_wait: float | timedelta | None = ...,
            unique_limit: int | None = ...,
            unique_while_running: WhileRunning | None = ...,
            **options: Any,
        ) -> AsyncResult[Any]: ...

        def delay(self, *partial_args: Any, **partial_kwargs: Any) -> AsyncResult[Any]: ...

    def _declared_as(template: Callable[_P, _R]) -> Callable[[Callable[..., _R]], Callable[_P, _R]]: ...

    def _apply_async(
        self: Any,
        args: Sequence[Any] | None = ...,
        kwargs: Mapping[str, Any] | None = ...,
        task_id: str | None = ...,
        producer: Any = ...,
        link: Any = ...,
        link_error: Any = ...,
        shadow: str | None = ...,
        *,
        unique: float | timedelta | None = ...,
        unique_on: UniqueOn | None = ...,
        unique_until: Until | None = ...,
        on_duplicate: OnDuplicate | None = ...,
        unique_on_store_error: OnStoreError | None = ...,
        unique_max_wait: float | timedelta | None = ...,
        unique_limit: int | None = ...,
        unique_while_running: WhileRunning | None = ...,
        **options: Any,
    ) -> AsyncResult[Any]: ...

    typed_apply_async = _declared_as(_apply_async)
else:
    UniqueSignature = Signature

    def typed_apply_async(impl: Callable[..., Any]) -> Callable[..., Any]:
        return impl
