// Alerts, all routed to one action group that must notify someone (an e-mail, a webhook or both;
// main.bicep deploys this module only with alertsEnabled and at least one receiver):
//   - HTTP 5xx rate (percent of requests in a 5-minute bin with at least minRequests requests),
//   - p95 request latency (same minimum),
//   - failed batch runs (the app logs the event "batch_failed"),
//   - batch files whose features drifted from the training data (PSI over 0.25: "batch_drift"),
//   - cold-start model load failures (the app logs the event "model_load_failed"),
//   - Event Grid: events dead-lettered, dropped, or failing delivery to the blob trigger's webhook
//     (a 401/403 from the webhook, e.g. after the blobs_extension key rotated, is not retried).
// The first four are log search alerts (scheduledQueryRules): a percentile and a 5xx share are not
// platform metrics of a Flex Consumption app, and the two events are the app's own structured logs.
// The event name is the log message (traces.message) and, when the logger adds it, the
// customDimensions field "event"; a logger.exception() call lands in the exceptions table.
// The Event Grid ones are metric alerts on the system topic.
// https://learn.microsoft.com/azure/event-grid/delivery-and-retry
// https://learn.microsoft.com/azure/azure-monitor/reference/supported-metrics/microsoft-eventgrid-systemtopics-metrics

@description('Azure region of the alert rules (the region of Application Insights).')
param location string

@description('Name prefix of the alert rules and the action group.')
param namePrefix string

@description('Resource id of Application Insights.')
param appInsightsId string

@description('Resource id of the Event Grid system topic of the data account.')
param systemTopicId string

@description('Receivers that are set: "email" and/or "webhook". ARM refuses an empty list, so no action group without a receiver is ever deployed.')
@minLength(1)
param receivers array

@description('E-mail address that receives alerts (with "email" in receivers).')
param alertEmail string = ''

@description('Webhook (Teams, Slack, PagerDuty, ...) that receives alerts in the common alert schema (with "webhook" in receivers).')
@secure()
param alertWebhookUrl string = ''

@description('Alert when more than this percent of requests in a 5-minute bin answer 5xx.')
@minValue(1)
@maxValue(100)
param http5xxPercentThreshold int = 5

@description('Alert when the 95th percentile of request duration exceeds this many milliseconds.')
@minValue(100)
param p95LatencyThresholdMs int = 2000

@description('Rate and percentile rules ignore 5-minute bins with fewer requests (one failed request in a quiet bin is not "100 % errors").')
@minValue(1)
param minRequests int = 20

@description('Tags for every resource.')
param tags object = {}

// Log event names the app emits (detector/telemetry.py); tests/test_infra.py checks they match.
var batchFailedEvent = 'batch_failed'
var modelLoadFailedEvent = 'model_load_failed'
var batchDriftEvent = 'batch_drift'

var eventQuery = 'union isfuzzy=true (traces | project timestamp, text = message, customDimensions), (exceptions | project timestamp, text = strcat(outerMessage, " ", tostring(customDimensions)), customDimensions) | where text contains "{0}" or tostring(customDimensions["event"]) == "{0}"'
var http5xxQuery = 'requests | summarize total = count(), failed = countif(toint(resultCode) >= 500) by bin(timestamp, 5m) | where total >= {0} | extend failedPercent = 100.0 * failed / total'
var p95Query = 'requests | where name !contains "health" | summarize p95 = percentile(duration, 95), calls = count() by bin(timestamp, 5m) | where calls >= {0}'

var emailReceivers = [
  {
    name: 'oncall-email'
    emailAddress: alertEmail
    useCommonAlertSchema: true
  }
]
var webhookReceivers = [
  {
    name: 'oncall-webhook'
    serviceUri: alertWebhookUrl
    useCommonAlertSchema: true
  }
]

// Event Grid metrics of the system topic that mean a batch file did not reach score_batch_blob.
var eventGridRules = [
  {
    name: 'dead-lettered'
    metric: 'DeadLetteredCount'
    severity: 1
    text: 'BlobCreated events were dead-lettered (not delivered to score_batch_blob): replay them (docs/RUNBOOKS.md, dead-lettered events).'
  }
  {
    name: 'dropped'
    metric: 'DroppedEventCount'
    severity: 0
    text: 'BlobCreated events were dropped (neither delivered nor dead-lettered): the files are not scored; re-upload them.'
  }
  {
    name: 'delivery-failed'
    metric: 'DeliveryAttemptFailCount'
    severity: 2
    text: 'Deliveries to the blob trigger webhook fail (retried, then dead-lettered): check the app and the subscription key.'
  }
]

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'ag-${namePrefix}'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: take('ptd${uniqueString(namePrefix)}', 12)
    enabled: true
    emailReceivers: contains(receivers, 'email') ? emailReceivers : []
    webhookReceivers: contains(receivers, 'webhook') ? webhookReceivers : []
  }
}

resource http5xx 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-${namePrefix}-http-5xx-rate'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: HTTP 5xx rate above ${http5xxPercentThreshold}%'
    description: 'Share of requests answered with a 5xx status, per 5-minute bin of at least ${minRequests} requests.'
    severity: 1
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    scopes: [
      appInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: format(http5xxQuery, minRequests)
          metricMeasureColumn: 'failedPercent'
          timeAggregation: 'Maximum'
          operator: 'GreaterThan'
          threshold: http5xxPercentThreshold
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource p95Latency 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-${namePrefix}-p95-latency'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: p95 latency above ${p95LatencyThresholdMs} ms'
    description: '95th percentile of request duration per 5-minute bin of at least ${minRequests} requests (health checks excluded).'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    scopes: [
      appInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: format(p95Query, minRequests)
          metricMeasureColumn: 'p95'
          timeAggregation: 'Maximum'
          operator: 'GreaterThan'
          threshold: p95LatencyThresholdMs
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource batchFailed 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-${namePrefix}-batch-failed'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: batch run failed'
    description: 'The blob-triggered batch function logged "${batchFailedEvent}".'
    severity: 1
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    scopes: [
      appInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: format(eventQuery, batchFailedEvent)
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource batchDrift 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-${namePrefix}-batch-drift'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: scored data drifted from the training data'
    description: 'A batch file was scored whose features are far from the training distribution (the event "${batchDriftEvent}": PSI over 0.25; summary.json names the features). The scores may be less reliable: see RUNBOOKS, "Drift".'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT1H'
    windowSize: 'PT1H'
    scopes: [
      appInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: format(eventQuery, batchDriftEvent)
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource modelLoadFailed 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-${namePrefix}-model-load-failed'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: model load failed on cold start'
    description: 'An instance could not load or verify the model ("${modelLoadFailedEvent}") and refuses to serve.'
    severity: 0
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    scopes: [
      appInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: format(eventQuery, modelLoadFailedEvent)
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource eventGridAlerts 'Microsoft.Insights/metricAlerts@2018-03-01' = [for rule in eventGridRules: {
  name: 'alert-${namePrefix}-eventgrid-${rule.name}'
  location: 'global'
  tags: tags
  properties: {
    description: rule.text
    severity: rule.severity
    enabled: true
    scopes: [
      systemTopicId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: rule.metric
          metricNamespace: 'Microsoft.EventGrid/systemTopics'
          metricName: rule.metric
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Total'
        }
      ]
    }
    autoMitigate: false
    actions: [
      {
        actionGroupId: actionGroup.id
      }
    ]
  }
}]

output actionGroupId string = actionGroup.id
output alertRuleNames array = [
  http5xx.name
  p95Latency.name
  batchFailed.name
  modelLoadFailed.name
]
