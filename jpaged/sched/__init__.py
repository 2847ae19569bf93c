from jpaged.sched.request import Request, RequestStatus
from jpaged.sched.output import ScheduledRequest, SchedulerOutput
from jpaged.sched.scheduler import Scheduler, SchedulerConfig

__all__ = ["Request", "RequestStatus", "Scheduler", "ScheduledRequest", "SchedulerConfig",
           "SchedulerOutput"]
