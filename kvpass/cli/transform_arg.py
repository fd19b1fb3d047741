"""`--transform "PruneHeads(0.1)"`: a transform written as a call, read without evaluating any code.

The text is parsed with `ast` and must be one call (or a bare name) of a registered transform
(`kvpass.transforms.TRANSFORMS`, which holds every `Transform` subclass with a name, kvpass's and
those a user's code defined) whose arguments are Python literals: numbers, strings, True/False/None,
lists, tuples and dicts of them. Anything else is refused with a message saying why.
"""

from __future__ import annotations

import ast

from kvpass.transforms import TRANSFORMS, Transform


def parse_transform(text: str) -> Transform:
    """The transform `text` writes, e.g. `"PruneHeads(0.1)"` or `"Evict('tova', span=2)"`.

    Example:
        >>> parse_transform("PruneHeads(0.25, importance='random')")
        PruneHeads(fraction=0.25, importance='random', max_per_layer=None, seed=0)
        >>> parse_transform("__import__('os').system('true')")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: "__import__('os').system('true')" must be a transform name or a call of one with literal ...
    """
    example = "e.g. PruneHeads(0.1)"
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"{text!r} is not a transform call ({error.msg}); {example}") from None
    if isinstance(tree, ast.Name):
        tree = ast.Call(func=tree, args=[], keywords=[])
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
        raise ValueError(f"{text!r} must be a transform name or a call of one with literal arguments, {example}")
    name = tree.func.id
    if name not in TRANSFORMS:
        raise ValueError(f"{text!r}: unknown transform {name!r}; known: {', '.join(sorted(TRANSFORMS))}")
    if any(isinstance(arg, ast.Starred) for arg in tree.args) or any(k.arg is None for k in tree.keywords):
        raise ValueError(f"{text!r}: write the arguments out (no *args or **kwargs)")
    args = [_literal(text, node) for node in tree.args]
    kwargs = {keyword.arg: _literal(text, keyword.value) for keyword in tree.keywords}
    try:
        return TRANSFORMS[name](*args, **kwargs)
    except TypeError as error:  # wrong arguments for the transform's signature
        raise ValueError(f"{text!r}: {error}") from None


def _literal(text: str, node: ast.expr):
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"{text!r}: argument {ast.unparse(node)!r} is not a literal (a number, string, True, "
                         "False, None, or a list/tuple/dict of them)") from None
