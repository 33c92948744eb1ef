def pytest_configure(config):
    config.addinivalue_line("markers", "ray: runs the Ray launcher on a simulated cluster in a network namespace "
                                       "(select with -m ray, leave out with -m 'not ray')")
