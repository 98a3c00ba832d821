"""Synchronous twins of async classes: each method made once, from the async one it runs.

A blocking class names its async twin's methods (``report = blocking(Client.report)``)
instead of writing each one again: the signature, the docstring and the types
(for mypy) come from the async method, so the two cannot drift apart.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, Self, TypeVar, overload

A = TypeVar("A")
A_co = TypeVar("A_co", covariant=True)
P = ParamSpec("P")
T = TypeVar("T")


class Twin(Protocol[A_co]):
    """A blocking object: the async object it stands for, and a way to run a coroutine."""

    @property
    def _async_twin(self) -> A_co: ...

    def _run(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T: ...


class blocking(Generic[A, P, T]):  # noqa: N801 (used like a decorator, named like one)
    """A method of a ``Twin`` that runs ``method`` of its async twin to completion."""

    def __init__(self, method: Callable[Concatenate[A, P], Coroutine[Any, Any, T]]) -> None:
        self._method = method
        self.__doc__ = method.__doc__
        signature = inspect.signature(method)
        twin, *rest = signature.parameters.values()
        # help() and IDEs show the method as written on the blocking class, and when called
        # on an instance without the self it is bound to.
        self.__signature__ = signature.replace(
            parameters=[inspect.Parameter("self", twin.kind), *rest]
        )
        self._bound_signature = signature.replace(parameters=rest)

    def __set_name__(self, owner: type, name: str) -> None:
        self.__name__ = name
        self.__qualname__ = f"{owner.__qualname__}.{name}"

    def __repr__(self) -> str:
        return f"<blocking {self.__qualname__}>"

    def __call__(self, twin: Twin[A], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run the async method on ``twin``'s async twin, in ``twin``'s loop."""
        method = self._method
        return twin._run(lambda: method(twin._async_twin, *args, **kwargs))

    @overload
    def __get__(self, obj: None, owner: type) -> Self: ...
    @overload
    def __get__(self, obj: Twin[A], owner: type) -> Callable[P, T]: ...
    def __get__(self, obj: Twin[A] | None, owner: type) -> Self | Callable[P, T]:
        if obj is None:
            return self

        def run(*args: P.args, **kwargs: P.kwargs) -> T:
            return self(obj, *args, **kwargs)

        run.__name__, run.__qualname__, run.__doc__ = self.__name__, self.__qualname__, self.__doc__
        run.__signature__ = self._bound_signature  # type: ignore[attr-defined]
        return run
