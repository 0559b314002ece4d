# find_python VERSION: the path of a CPython VERSION interpreter (e.g. 3.13), pyenv's newest
# patch release first. pyenv's interpreters are found by their directory, so a PATH without
# pyenv (env -i, a service manager) finds them too. Sourced by .ci/run and fuzz/build.sh.
find_python() {
    local version=$1 root candidate
    root=${PYENV_ROOT:-$HOME/.pyenv}
    candidate=$(ls -d "$root"/versions/"$version".* 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$candidate" ] && [ -x "$candidate/bin/python$version" ]; then
        echo "$candidate/bin/python$version"
        return
    fi
    command -v "python$version" || { echo "python$version not found" >&2; return 1; }
}
