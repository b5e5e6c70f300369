"""The command-line tools' argument parser: a mistake in the flags is one line on stderr and exit status 1, like
every other user error of these tools (argparse prints its usage block first and exits 2)."""

import argparse


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {message}; run with --help for the flags\n")
