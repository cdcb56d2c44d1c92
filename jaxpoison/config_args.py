"""The options a config takes after its path: ``configs/x.py:tiny,epochs=20,poisons=a+b``.

ml_collections hands ``get_config`` everything after the colon as one string. `parse` splits it
into bare flags and ``field=value`` pairs, each value read by the parser the config names for
its field, and refuses anything else with the usage line, so a typo never passes silently::

    flags, values = config_args.parse(
        arg,
        flags=("tiny",),
        fields={"epochs": config_args.positive_int, "archs": config_args.names(ARCHS)},
    )
"""


def parse(arg, *, flags=(), fields=None):
    """Splits a comma-separated config argument into (set of flags, {field: parsed value}).

    Args:
      arg: the string after the config path's colon, or None.
      flags: the bare words allowed, e.g. ``("tiny",)``.
      fields: ``{field: parser}``; ``parser(field, value)`` returns the parsed value or raises
        ValueError naming ``field=value`` and an example.

    Raises:
      ValueError: an option that is neither a flag nor a known ``field=value``, naming them all.
    """
    fields = fields or {}
    chosen, values = set(), {}
    for option in arg.split(",") if arg else ():
        field, sep, value = option.partition("=")
        if not sep and option in flags:
            chosen.add(option)
        elif sep and field in fields:
            values[field] = fields[field](field, value)
        else:
            usage = [*flags, *(f"{f}=<...>" for f in fields)]
            raise ValueError(
                f"Unknown config argument {arg!r} (at {option!r}); use a comma-separated list of "
                f"{', '.join(usage)}."
            )
    return chosen, values


def positive_int(field, value):
    """A whole number ≥ 1, e.g. ``epochs=20``."""
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{field}={value!r}: give a positive whole number, e.g. {field}=20.")
    return int(value)


def positive_float(field, value):
    """One positive number, e.g. ``warmup_epochs=2`` or ``0.5``."""
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0:
        raise ValueError(f"{field}={value!r}: give one positive number, e.g. {field}=2.")
    return number


def positive_floats(field, value):
    """``+``-separated positive numbers, e.g. ``lambdas=1+6``, as a tuple of floats."""
    try:
        numbers = tuple(float(v) for v in value.split("+"))
    except ValueError:
        numbers = ()
    if not numbers or min(numbers) <= 0:
        raise ValueError(f"{field}={value!r}: give positive numbers, e.g. {field}=1+6.")
    return numbers


def names(choices=None):
    """A parser of ``+``-separated names, e.g. ``archs=mlp+cnn``, each among `choices`.

    With ``choices=None`` any non-empty names pass (the config checks them against a table that
    depends on its other options).
    """

    def parse_names(field, value):
        items = value.split("+")
        unknown = sorted(set(items) - set(choices)) if choices is not None else []
        if not all(items) or unknown:
            among = f"; {unknown} not among {sorted(choices)}" if choices is not None else ""
            raise ValueError(f"{field}={value!r}{among}: give names joined by '+', e.g. a+b.")
        return items

    return parse_names


def keep(table, chosen, what):
    """The entries of `table` named in `chosen` (in `table`'s order); names it lacks are an error.

    ``what`` names the option in the message, e.g. ``keep(objectives, ["erm"], "objectives")``.
    """
    missing = sorted(set(chosen) - set(table))
    if missing:
        raise ValueError(f"{what}={'+'.join(chosen)}: {missing} not among {sorted(table)}.")
    return {k: v for k, v in table.items() if k in chosen}
