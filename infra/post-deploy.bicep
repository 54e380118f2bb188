// What can only be deployed once the code runs, because it needs a key the Functions host creates:
//   - the Event Grid subscription of the blob trigger: webhook
//     https://<app>/runtime/webhooks/blobs?functionName=Host.Functions.score_batch_blob&code=<blobs_extension key>
//     (that system key exists only after the blob extension has started), BlobCreated events under
//     batch-in/, an explicit retry policy, and dead-lettering into the data account with the
//     system topic's identity (infra/modules/eventgrid.bicep gives it the role);
//   - the Application Insights standard availability test of /api/health, which needs a function
//     key (the dedicated host key `availability-test`), and its alert.
// Deployed by scripts/post-deploy.sh (deploy workflow and azd postdeploy hook) with the keys as
// secure parameters: they are neither logged nor kept in the deployment history.
// https://learn.microsoft.com/azure/azure-functions/functions-event-grid-blob-trigger
// https://learn.microsoft.com/azure/event-grid/delivery-and-retry
// https://learn.microsoft.com/azure/azure-monitor/app/availability (standard test)
targetScope = 'resourceGroup'

@description('Azure region of the availability test (the region of Application Insights).')
param location string = resourceGroup().location

@description('Function App name.')
param functionAppName string

@description('Event Grid system topic on the data account.')
param systemTopicName string

@description('Data storage account (dead letters go to its dead-letter container).')
param storageAccountName string

@description('Container the utilities drop billing exports into.')
param batchInContainerName string = 'batch-in'

@description('Dead-letter container in the data account.')
param deadLetterContainerName string = 'eventgrid-deadletter'

@description('The blobs_extension system key of the Function App (az functionapp keys list ... systemKeys.blobs_extension).')
@secure()
param blobsExtensionKey string

@description('Delivery attempts before an event is dead-lettered (Event Grid allows 1-30).')
@minValue(1)
@maxValue(30)
param maxDeliveryAttempts int = 30

@description('Minutes an event is retried before it is dead-lettered (Event Grid allows 1-1440).')
@minValue(1)
@maxValue(1440)
param eventTimeToLiveInMinutes int = 1440

@description('Application Insights component name.')
param appInsightsName string

@description('Function key the availability test sends (the host key `availability-test`); empty: no availability test.')
@secure()
param healthCheckKey string = ''

@description('Availability test locations (Microsoft recommends at least five).')
param availabilityTestLocations array = [
  'emea-nl-ams-azr'
  'emea-gb-db3-azr'
  'emea-se-sto-edge'
  'us-va-ash-azr'
  'apac-sg-sin-azr'
]

@description('Action group of the alerts (main.bicep output actionGroupId); empty: no availability alert.')
param actionGroupId string = ''

@description('Tags for every resource.')
param tags object = {}

var subscriptionName = 'batch-in-to-score-batch-blob'
var blobFunctionName = 'score_batch_blob'

resource app 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' existing = {
  name: systemTopicName
}

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource blobTrigger 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: systemTopic
  name: subscriptionName
  properties: {
    destination: {
      endpointType: 'WebHook'
      properties: {
        endpointUrl: 'https://${app.properties.defaultHostName}/runtime/webhooks/blobs?functionName=Host.Functions.${blobFunctionName}&code=${blobsExtensionKey}'
        maxEventsPerBatch: 1
      }
    }
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
      ]
      subjectBeginsWith: '/blobServices/default/containers/${batchInContainerName}/'
    }
    // Explicit, not the defaults by omission: a transient failure (5xx, timeout, a cold start) is
    // retried on Event Grid's schedule for up to a day; what still fails, and what is never retried
    // (webhook 400, 401, 403, 413), is dead-lettered instead of dropped.
    retryPolicy: {
      maxDeliveryAttempts: maxDeliveryAttempts
      eventTimeToLiveInMinutes: eventTimeToLiveInMinutes
    }
    deadLetterWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: {
          resourceId: account.id
          blobContainerName: deadLetterContainerName
        }
      }
    }
  }
}

resource healthTest 'Microsoft.Insights/webtests@2022-06-15' = if (!empty(healthCheckKey)) {
  name: 'webtest-health-${functionAppName}'
  location: location
  // The hidden-link tag ties the test to the Application Insights resource (required).
  tags: union(tags, {
    'hidden-link:${appInsights.id}': 'Resource'
  })
  kind: 'standard'
  properties: {
    SyntheticMonitorId: 'webtest-health-${functionAppName}'
    Name: '${functionAppName} /api/health'
    Description: 'GET /api/health must answer 200 with status ok (the model is loaded and verified).'
    Enabled: true
    Frequency: 300
    Timeout: 30
    Kind: 'standard'
    RetryEnabled: true
    Locations: [for id in availabilityTestLocations: {
      Id: id
    }]
    Request: {
      RequestUrl: 'https://${app.properties.defaultHostName}/api/health'
      HttpVerb: 'GET'
      Headers: [
        {
          key: 'x-functions-key'
          value: healthCheckKey
        }
      ]
      ParseDependentRequests: false
    }
    ValidationRules: {
      ExpectedHttpStatusCode: 200
      SSLCheck: true
      SSLCertRemainingLifetimeCheck: 7
      ContentValidation: {
        ContentMatch: '"status":"ok"'
        IgnoreCase: false
        PassIfTextFound: true
      }
    }
  }
}

resource healthAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = if (!empty(healthCheckKey) && !empty(actionGroupId)) {
  name: 'alert-${functionAppName}-health-unavailable'
  location: 'global'
  tags: tags
  properties: {
    description: '/api/health failed from at least two test locations: follow docs/RUNBOOKS.md, a cold-start failure.'
    severity: 1
    enabled: true
    scopes: [
      healthTest.id
      appInsights.id
    ]
    evaluationFrequency: 'PT1M'
    windowSize: 'PT5M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.WebtestLocationAvailabilityCriteria'
      webTestId: healthTest.id
      componentId: appInsights.id
      failedLocationCount: 2
    }
    actions: [
      {
        actionGroupId: actionGroupId
      }
    ]
  }
}

output eventSubscriptionName string = blobTrigger.name
