"""Test doubles shared by several test modules."""

import concurrent.futures


class SpyExecutor(concurrent.futures.ThreadPoolExecutor):
    """A one-thread executor that counts what was handed to it."""

    def __init__(self):
        super().__init__(max_workers=1)
        self.submitted = 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return super().submit(*args, **kwargs)
