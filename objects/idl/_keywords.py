"""Words the backends cannot emit as identifiers: C17, C++23, Java and Python keywords.

The Mink IDL compiler keeps such a list for its C, C++ and Java backends: where a backend
writes an IDL name that is a keyword of its language, it writes it with a leading ``_``
and prints a warning (its own test IDL names a struct ``break``).  It does so for struct
and field names in C and Java and for method names in C++ and Java, nowhere else.  The
reader warns the same way, adding Python's keywords for every name (the Python backend
renames them the same way, and a parameter named ``self``).
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
#: A parameter cannot be named ``self`` either: the Python backend's methods take it first.
_PYTHON_PARAMETER: Final = _PYTHON | {"self"}


#: Which backends rename which kind of name (the others write every name as it is).
_RENAMED_BY: Final = {
    "struct": ("C", "Java"),
    "field": ("C", "Java"),
    "method": ("C++", "Java"),
}
_WORDS: Final = {"C": _C17, "C++": _CPP23, "Java": _JAVA, "Python": _PYTHON}


def reserved_in(name: str, kind: str) -> tuple[str, ...]:
    """The languages among ``"C"``, ``"C++"``, ``"Java"``, ``"Python"`` whose backend
    renames ``name`` used as a ``kind`` (``"struct"``, ``"field"``, ``"method"``, or any
    other kind of name: Python only) because it is one of their keywords."""
    langs = (*_RENAMED_BY.get(kind, ()), "Python")
    words = {**_WORDS, "Python": _PYTHON_PARAMETER} if kind == "parameter" else _WORDS
    return tuple(lang for lang in langs if name in words[lang])
