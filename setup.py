"""Build hook: ship the top-level Hydra tree, conf/, inside the wheel as genlab/conf/.

All metadata lives in pyproject.toml. This file exists only because conf/ sits outside the
package (src/genlab), where it is the one tree that users and tests edit, and package-data
globs can only reach files inside a package's own directory. So at build time the YAML files
under conf/ are copied into the build's genlab/conf/, and `genlab.utils.CONF_DIR` finds them
there in an installed (non-editable) package. Editable installs skip the copy and keep reading
the checkout's conf/ live. MANIFEST.in puts conf/ into the sdist, so a wheel built from the
sdist gets it too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"
PATTERN = "**/*.yaml"


class build_py_with_conf(build_py):  # noqa: N801 -- a setuptools command class
    """build_py, then conf/**/*.yaml -> <build_lib>/genlab/conf/ (not in editable mode)."""

    def _conf_files(self) -> list[Path]:
        if self.editable_mode:
            return []
        if not (CONF / "config.yaml").is_file():
            raise FileNotFoundError(f"{CONF}/config.yaml not found: conf/ must ship with genlab")
        return sorted(CONF.glob(PATTERN))

    def _conf_target(self, src: Path) -> str:
        return str(Path(self.build_lib, "genlab", "conf", src.relative_to(CONF)))

    def run(self) -> None:
        super().run()
        files = self._conf_files()
        if not files:
            return
        # build/lib survives between builds: clear it so a YAML deleted or renamed in conf/
        # does not ship from an earlier build
        shutil.rmtree(Path(self.build_lib, "genlab", "conf"), ignore_errors=True)
        for src in files:
            target = self._conf_target(src)
            self.mkpath(str(Path(target).parent))
            self.copy_file(str(src), target)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return super().get_outputs(include_bytecode) + [
            self._conf_target(src) for src in self._conf_files()
        ]


setup(cmdclass={"build_py": build_py_with_conf})
