from ctsd.cli import run

run()
