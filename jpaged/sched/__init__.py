from jpaged.sched.request import Request, RequestStatus
from jpaged.sched.output import ScheduledRequest, SchedulerOutput
from jpaged.sched.policy import PrefillEstimator, RequestRefused
from jpaged.sched.scheduler import Scheduler, SchedulerConfig

__all__ = ["PrefillEstimator", "Request", "RequestRefused", "RequestStatus", "Scheduler", "ScheduledRequest", "SchedulerConfig",
           "SchedulerOutput"]
