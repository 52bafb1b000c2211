//! Process-shared semaphores on futex words (filled in by the synchronize work).
