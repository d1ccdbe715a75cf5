"""`python -m srpo …` and `torchrun -m srpo …` run the same CLI as the `srpo` command."""

from srpo.cli import main

main()
