"""``docs/architecture.md`` matches the tree: it names every module of the package."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import llamaswap

PACKAGE = Path(llamaswap.__file__).parent
PAGE = PACKAGE.parent / "docs" / "architecture.md"


class ArchitectureTests(SynchronousTestCase):
    def test_every_module_of_the_package_is_named(self) -> None:
        page = PAGE.read_text()
        missing = []
        for module in sorted(PACKAGE.rglob("*.py")):
            name = module.relative_to(PACKAGE).as_posix()
            if module.name == "__init__.py":
                continue
            if f"`{name}`" not in page:
                missing.append(name)
        self.assertEqual(missing, [])

    def test_every_named_module_exists(self) -> None:
        page = PAGE.read_text()
        for row in page.splitlines():
            if row.startswith("| `") and ".py`" in row.split("|")[1]:
                name = row.split("`")[1]
                self.assertTrue((PACKAGE / name).is_file(), name)
