# Source this from the repository root to import the source folders as ``dsv4.*`` without installing
# (the lent GPU machines have no package index). An editable install (`pip install -e .`) does the same.
_dsv4_root=$(pwd)
_dsv4_site=${TMPDIR:-/tmp}/dsv4-path-$$
mkdir -p "$_dsv4_site/dsv4"
for _d in engine kernels cache train; do ln -sfn "$_dsv4_root/$_d" "$_dsv4_site/dsv4/$_d"; done
ln -sfn "$_dsv4_root/dsv4cli" "$_dsv4_site/dsv4/cli"
export PYTHONPATH="$_dsv4_site${PYTHONPATH:+:$PYTHONPATH}"
