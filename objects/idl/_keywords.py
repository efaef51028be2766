"""Words the backends cannot emit as identifiers: C17, C++23, Java and Python keywords.

The Mink IDL compiler keeps such a list for its C, C++ and Java backends: an IDL name that
is a keyword of the target language is renamed with a leading ``_`` and a warning is
printed (its own test IDL names a struct ``break``).  The reader warns the same way, and
adds Python's keywords (the Python backend renames them the same way).
"""

from __future__ import annotations

import keyword
from typing import Final

__all__ = ["reserved_in"]


def _words(text: str) -> list[str]:
    return text.split()


_C17: Final = frozenset(
    _words(
        """auto break case char const continue default do double else enum extern float for
    goto if inline int long register restrict return short signed sizeof static struct
    switch typedef union unsigned void volatile while _Alignas _Alignof _Atomic _Bool
    _Complex _Generic _Imaginary _Noreturn _Static_assert _Thread_local"""
    )
)

_CPP23: Final = frozenset(
    _words(
        """alignas alignof asm auto bool break case catch char char8_t char16_t char32_t class
    concept const consteval constexpr constinit const_cast continue co_await co_return
    co_yield decltype default delete do double dynamic_cast else enum explicit export
    extern false float for friend goto if inline int long mutable namespace new noexcept
    nullptr operator private protected public register reinterpret_cast requires return
    short signed sizeof static static_assert static_cast struct switch template this
    thread_local throw true try typedef typeid typename union unsigned using virtual void
    volatile wchar_t while"""
    )
)

_JAVA: Final = frozenset(
    _words(
        """abstract assert boolean break byte case catch char class const continue default do
    double else enum extends final finally float for goto if implements import instanceof
    int interface long native new package private protected public return short static
    strictfp super switch synchronized this throw throws transient try void volatile
    while"""
    )
)

_PYTHON: Final = frozenset(keyword.kwlist)


def reserved_in(name: str) -> tuple[str, ...]:
    """The languages (``"C"``, ``"C++"``, ``"Java"``, ``"Python"``) reserving ``name``."""
    return tuple(
        lang
        for lang, words in (("C", _C17), ("C++", _CPP23), ("Java", _JAVA), ("Python", _PYTHON))
        if name in words
    )
