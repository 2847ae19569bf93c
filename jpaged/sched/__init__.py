from jpaged.sched.request import Request, RequestStatus
from jpaged.sched.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

__all__ = ["Request", "RequestStatus", "Scheduler", "SchedulerConfig", "SchedulerOutput"]
