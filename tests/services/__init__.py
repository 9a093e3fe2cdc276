"""Services the tests start for themselves: the gateway under test and the clusters it drives."""
