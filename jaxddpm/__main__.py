from jaxddpm.main import run

run()
