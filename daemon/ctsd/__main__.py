from ctsd.launch import run

run()
