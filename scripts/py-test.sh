#!/usr/bin/env bash
# The Python package's tests (./scripts/test.sh runs them after cargo's): build symmcomm from
# python/ with maturin into a wheel (dev profile, sharing the workspace's debug build), install
# it into .ci-cache/py-site, and run pytest on python/tests. Arguments go to pytest.
#
# Without torch the torch tests skip; without a GPU the GPU tests skip, each with its reason
# (SYMMCOMM_REQUIRE_GPU=1 makes them fail instead). Needs only Python 3.9+ with pip (the tools
# come from scripts/py-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/py-env.sh
source scripts/py-env.sh
wheels=.ci-cache/py-wheel
site=.ci-cache/py-site
rm -rf "${wheels}" "${site}"
(cd python && maturin build --compatibility linux --out "../${wheels}")
PIP_ROOT_USER_ACTION=ignore "${SYMMCOMM_PY}" -m pip install --quiet --disable-pip-version-check \
    --no-index --no-deps --target "${site}" "${wheels}"/symmcomm-*.whl
PYTHONPATH="${PWD}/${site}:${PYTHONPATH}" "${SYMMCOMM_PY}" -m pytest python/tests -q -rs "$@"
