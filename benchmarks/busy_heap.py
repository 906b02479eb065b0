"""What a busy notebook holds, as cell code the benchmarks run (in a kernel or a shell)."""

# 10,000 user variables of mixed kinds: ints, strings, small lists and dicts, small objects.
NAMES = """
class Obj:
    pass
for index in range(10_000):
    kind = index % 5
    if kind == 0:
        value = index
    elif kind == 1:
        value = f"text {index}"
    elif kind == 2:
        value = [index, index + 1, {"k": index}]
    elif kind == 3:
        value = {"a": [index], "b": (index,)}
    else:
        value = Obj()
        value.payload = [index] * 3
    globals()[f"var_{index}"] = value
del index, kind, value
"""

# A tokenized dataset: a list of a million small lists, bound to a name.
TOKENS = "tokens = [[i % 50_000, (i * 7) % 50_000] for i in range(1_000_000)]\n"
