"""``python -m nlj.models [FAMILY ...] [--size SIZE ...]``: parameter table of the presets.

Lists every registered preset family (or the named ones) at every size (or the named ones);
counts come from ``nnx.eval_shape`` of the real modules, so nothing is allocated.
"""

import argparse

from nlj.models.configs import PRESET_FAMILIES, SIZES
from nlj.models.registry import families
from nlj.models.summary import format_table, preset_rows


def main() -> None:
  parser = argparse.ArgumentParser(prog="python -m nlj.models", description=__doc__)
  parser.add_argument("family", nargs="*", choices=PRESET_FAMILIES, help="families to list")
  parser.add_argument("--size", nargs="+", default=[], choices=SIZES, help="sizes to list")
  args = parser.parse_args()
  print(format_table(preset_rows(tuple(args.family), tuple(args.size))))
  missing = [f for f in args.family or PRESET_FAMILIES if f not in families()]
  if missing:
    print(f"\npreset families not registered yet: {', '.join(missing)}")


if __name__ == "__main__":
  main()
